//! Naming the grant a refused statement needs. PostgreSQL refuses a statement the role may not
//! run with SQLSTATE 42501 (`insufficient_privilege`, "permission denied for schema segment");
//! that is no outage to wait out but a grant to give, so it becomes
//! [`LoadError::PermissionDenied`] with the statement an administrator runs.

use sqlx::PgPool;

use super::{LoadError, Pool, Warehouse};
use crate::schema::quote_ident;

/// PostgreSQL's SQLSTATE for a missing privilege.
const INSUFFICIENT_PRIVILEGE: &str = "42501";

/// What a statement needed from the role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Need {
    /// `CREATE SCHEMA`: `CREATE` on the database, unless the schema is created beforehand.
    CreateSchema,
    /// Creating tables in the schema, and reading and writing them: `USAGE` and `CREATE` on it.
    CreateInSchema,
}

/// The grant that gives `role` what `need` asks for, as an administrator would run it.
pub(super) fn grant(need: Need, schema: &str, role: &str, database: &str) -> String {
    let (schema, role, database) = (
        quote_ident(schema),
        quote_ident(role),
        quote_ident(database),
    );
    match need {
        Need::CreateSchema => format!(
            "as an administrator, either run GRANT CREATE ON DATABASE {database} TO {role}; or \
             create the schema beforehand: CREATE SCHEMA {schema}; GRANT USAGE, CREATE ON SCHEMA \
             {schema} TO {role};"
        ),
        Need::CreateInSchema => format!(
            "as an administrator or the schema's owner, run GRANT USAGE, CREATE ON SCHEMA \
             {schema} TO {role};"
        ),
    }
}

/// The role and database a PostgreSQL pool connects as.
fn identity(pool: &PgPool) -> (String, String) {
    let options = pool.connect_options();
    let role = options.get_username().to_owned();
    // PostgreSQL's own default: the database named like the role.
    let database = options.get_database().unwrap_or(&role).to_owned();
    (role, database)
}

impl Warehouse {
    /// The error for a failed DDL statement that needed `need`: a missing privilege names the
    /// grant; anything else is classified as usual.
    pub(super) fn ddl_error(&self, error: sqlx::Error, need: Need) -> LoadError {
        let denied = match (&error, &self.pool) {
            (sqlx::Error::Database(db), Pool::Postgres(pool))
                if db.code().as_deref() == Some(INSUFFICIENT_PRIVILEGE) =>
            {
                Some((db.message().to_owned(), pool))
            }
            _ => None,
        };
        match denied {
            Some((message, pool)) => {
                let (role, database) = identity(pool);
                LoadError::PermissionDenied {
                    message,
                    grant: grant(need, &self.schema, &role, &database),
                }
            }
            None => self.error(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_name_the_schema_role_and_database_quoted() {
        assert_eq!(
            grant(Need::CreateInSchema, "segment", "loader", "warehouse"),
            "as an administrator or the schema's owner, run GRANT USAGE, CREATE ON SCHEMA \
             \"segment\" TO \"loader\";"
        );
        let create = grant(Need::CreateSchema, "segment", "a\"b", "warehouse");
        assert!(
            create.contains("GRANT CREATE ON DATABASE \"warehouse\" TO \"a\"\"b\";"),
            "{create}"
        );
        assert!(
            create.contains("CREATE SCHEMA \"segment\"; GRANT USAGE, CREATE ON SCHEMA \"segment\""),
            "{create}"
        );
    }

    #[tokio::test]
    async fn the_pool_names_role_and_database() {
        let pool = sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://loader:pw@127.0.0.1:1/warehouse")
            .expect("lazy pool");
        assert_eq!(
            identity(&pool),
            ("loader".to_owned(), "warehouse".to_owned())
        );
    }
}
